"""Building a checkpoint corpus and training a generator on it (not needed at run time).

``pretrain.store`` is the on-disk corpus format; ``pretrain.corpus`` trains many networks at once
and fills a store. Nothing in :mod:`learned_opt` imports this package.
"""
