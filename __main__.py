from treesynth.engine.cli import main

main()
