from treesynth.engine.entry import main

main()
