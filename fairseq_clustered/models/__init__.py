"""Registered fairseq models with clustered attention.

* translation: ``clustered_transformer`` (+ ``clustered_transformer_iwslt_de_en``, ...)
* speech-to-text: ``clustered_s2t_transformer_s/m/l`` (+ the other s2t sizes)
* masked LM: ``clustered_roberta_base/large`` (+ ``clustered_roberta_tiny``)
* language models: ``clustered_transformer_lm`` (+ every ``transformer_lm`` size; causal variant)
"""

from .clustered_lm import ClusteredTransformerLanguageModel
from .clustered_roberta import ClusteredRobertaEncoder, ClusteredRobertaModel
from .clustered_s2t_transformer import ClusteredS2TTransformerEncoder, ClusteredS2TTransformerModel
from .clustered_transformer import ClusteredTransformerModel

__all__ = [
    "ClusteredRobertaEncoder",
    "ClusteredRobertaModel",
    "ClusteredS2TTransformerEncoder",
    "ClusteredS2TTransformerModel",
    "ClusteredTransformerLanguageModel",
    "ClusteredTransformerModel",
]
