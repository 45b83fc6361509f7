"""Stage 1, data: collections on disk -> one row schema -> patient-level splits -> WebDataset
shards with index.json -> batches for one rank.

    sources/      one reader per collection format (iu, nih, folder, csv) -> rows of one schema
    findings      the findings vocabulary: each source's raw labels -> per-finding targets, masked
                  where the source does not annotate a finding (docs/findings.md)
    split         patient-level, stratified, seeded train/val/test and k folds
    dicom, preprocess   reading a film the one way every path reads it
    shards, prepare     films -> shards + index.json (`cxr-dist prepare`)
    index         ShardIndex: what index.json says (splits, labels, sources, views, settings)
    transforms, device_input   augmentation and resizing (workers or the training device)
    stream        shards -> batches for one rank (train: fixed length; eval: every sample once)
    mixing        several sources in one run: sampling weights, per-source loss weights
    text          each sample's text fields (reports), and the guard against inputs that read the label

May import: the root modules (config, errors, log, fileio). Nothing from model/, eval/,
product/, runs/ or train/ (tests/test_architecture.py).
A new collection format: a module in sources/ with `read(src) -> (rows, skipped)`, listed in
sources.READERS and config.SOURCE_FORMATS.
"""
