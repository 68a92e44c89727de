"""Rebuild the small byte-level BPE tokenizer shipped for the `tiny` preset (no Hub needed).

    python scripts/make_tiny_tokenizer.py [--data-dir DIR]   (default: loradrift's own copy)

It is trained on task text, so it tokenises all four tasks sensibly with a 2k vocabulary.
"""

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from loradrift.data import PACKAGED_DATA

OUT = Path(__file__).resolve().parents[1] / "src/loradrift/assets/tiny_tokenizer"


def corpus(data_dir: Path):
    for rel in ["glue/SST-2/train.tsv", "glue/MRPC/train.tsv", "glue/RTE/train.tsv"]:
        yield from (data_dir / rel).read_text(encoding="utf-8-sig").splitlines()[1:5001]
    squad = json.loads((data_dir / "squad_v2/train-v2.0.first10articles.json").read_text())
    for art in squad["data"]:
        for p in art["paragraphs"]:
            yield p["context"]
            for qa in p["qas"]:
                yield qa["question"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=PACKAGED_DATA, help="task data folder (default: %(default)s)")
    args = ap.parse_args()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(args.data_dir), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} (vocab {len(fast)})")


if __name__ == "__main__":
    main()
