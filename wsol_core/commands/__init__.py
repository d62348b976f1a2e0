"""The command-line programs, importable: ``jobs/*.py`` and ``tune/search_srd.py`` run them as
scripts (as ``ray job submit --working-dir . -- python jobs/train_imagenet.py`` does), and
``[project.scripts]`` installs them as ``wsol-train``, ``wsol-search``, ... Each module's
``main(argv)`` returns the exit status.
"""
