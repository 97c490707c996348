"""treesynth: the TreeSynth method on a local llama.cpp model, checkpointed in SQLite."""

__version__ = "0.2.0"
