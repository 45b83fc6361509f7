"""Test data for image+text models: a tiny BERT saved as a user's folder, and an IU-layout
dataset whose reports carry a label signal in the indication (a legitimate input) and the label
itself in the findings and impression (the leak), as IU's do."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from tests.datagen import expected_label, make_dataset

WORDS = ("indication comparison findings impression chest pain cough routine exam fever follow up "
         "normal heart lungs clear cardiomegaly effusion opacity none prior study of the and with").split()


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with random weights and a WordPiece vocabulary of WORDS (plus
    letters and digits, so any text tokenizes), saved with `save_pretrained` into `folder`."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;-") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(WORDS + letters))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_gpt2(folder: Path, corpus: list[str], vocab_size: int = 300, seed: int = 1) -> Path:
    """A 2-layer, 32-wide GPT-2 with random weights and a byte-level BPE of `vocab_size` trained on
    `corpus`, and no pad token, saved with `save_pretrained` into `folder`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_embd=32, n_layer=2, n_head=2,
                                     n_positions=128, bos_token_id=0, eos_token_id=0)
    transformers.GPT2Model(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def indication_of(uid: int) -> str:
    """Chest pain for most abnormal studies, a routine exam for most normal ones; every fifth
    study gets the other one (the indication says something, not everything)."""
    abnormal = bool(expected_label(uid))
    if uid % 5 == 0:
        abnormal = not abnormal
    return "Chest pain." if abnormal else "Routine exam."


def make_text_dataset(root: Path, n_uids: int = 40) -> Path:
    """make_dataset's IU folder with informative indications and, on every seventh study, an
    empty indication (a report without one)."""
    make_dataset(root, n_uids=n_uids, size=64)
    path = root / "indiana_reports.csv"
    rows = list(csv.reader(path.open()))
    header = rows[0]
    i = header.index("indication")
    for row in rows[1:]:
        uid = int(row[0])
        row[i] = "" if uid % 7 == 0 else indication_of(uid)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root
