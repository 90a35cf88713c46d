"""Cross-tokenizer alignment for GOLD: byte offsets of tokens, groups of student and teacher tokens
that spell the same bytes, merged probabilities of a group, and the map of tokens both vocabularies
share.

A batch flows through it like this (the data room calls it; torch and tokenizers only here):

    s = [byte_spans(student_tok, ids=ids) for ids in student_completion_ids]        # on-policy
    t = [byte_spans(teacher_tok, text=text, ids=ids) for text, ids in teacher_rows]  # template-rendered
    groups = group_spans(s, t)
    s_scale = merge_log_scales(student_rows, student_ids, s_row_start, s_row_end)   # per group
    vmap = vocabulary_map(student_tok, teacher_tok)                                 # once

Each module's docstring states its rules: ``spans`` (token families, dummy prefixes, locating a
text in template-rendered ids), ``groups`` (boundaries, tiling, coverage), ``merge`` (why the first
row of a group carries its distribution), ``vocab`` (which pieces are matched), ``prefix`` (byte-prefix
projections between vocabularies and the events ``byte_prefix_jsd`` compares).
"""

from .groups import Groups, group_spans
from .merge import merge_log_scales
from .prefix import BOTH, STUDENT, TEACHER, PrefixEvents, PrefixProjection, prefix_events, prefix_projection
from .spans import UnsupportedTokenizerError, byte_spans, token_bytes, tokenizer_family
from .vocab import VocabularyMap, vocabulary_map

__all__ = ["byte_spans", "token_bytes", "tokenizer_family", "UnsupportedTokenizerError", "group_spans", "Groups",
           "merge_log_scales", "vocabulary_map", "VocabularyMap", "prefix_projection", "PrefixProjection",
           "prefix_events", "PrefixEvents"]
