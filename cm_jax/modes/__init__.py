"""The modes of launch.py: train, sample, edit, eval. Siblings: each imports the layers below it and
never another mode. Each has `main(config, workdir, **flags)`."""

MODES = ('train', 'sample', 'edit', 'eval')
