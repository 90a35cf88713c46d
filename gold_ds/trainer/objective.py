"""The loss of one micro-step, in two calls the loop times apart: ``teacher_targets(micro_batches)``
(teacher forward, no grad; one target per micro batch) and ``loss(micro_batch, targets)`` (student
forward, summed loss).

The teacher's forward of several text micro-steps runs as one batch (their inputs stacked, see
``gold_ds.data.concat_batches``, and its outputs cut back per micro-step): ZeRO-3 gathers the
teacher's parameters, and runs its hooks, once for all of them instead of once per micro-step
(``teacher.forward_micro_steps``). The cost is memory: the teacher's activations of that batch while
a layer runs, and its outputs (final hidden states of the completion rows with ``sharded``, [B, T, V]
logits with ``full``) until each micro-step's loss has used them.

``loss`` returns ``(loss, share)``: the tensor to backpropagate and this rank's share of the
micro-step's summed loss, for the metrics. The loop scales the loss by world / N, N the student's
completion tokens in the window on all ranks (see loop.py), so the optimizer follows the mean loss
per student completion token whatever the loss:

    loss = divergence_weight * sum(divergence rows) + ce_weight * sum(student NLL of completion tokens)

- ``jsd`` (shared tokenizer): one divergence row per completion token.
- ``uld`` / ``hybrid_uld`` (any two tokenizers): one divergence row per aligned group (a byte span
  both sides cover, and the end-of-turn pair; the micro batch's ``alignment``, see
  ``gold_ds.data.cross_tokenizer``). A group's row
  is the distribution at its first token, times the chain-rule probability of its other actual
  tokens, passed to the loss as a per-row log scale (``gold_ds.align.merge_log_scales``), on both
  sides, at each side's temperature. Tokens outside any group add no divergence (the alignment
  coverage metric says how many bytes are covered) but still count in N.
- ``byte_prefix_jsd`` (any two tokenizers): one divergence row per comparison event inside the aligned
  groups (``gold_ds.align.prefix_events``: every byte offset where one side starts a token that
  ends within the other's covering token, and the end-of-turn pair); each event compares the finer
  side's row with the coarser side's row projected through byte prefixes
  (``gold_ds.losses.byte_prefix_jsd``). No merged log scales.

How the logits are formed (``distill.logits``):
- ``full``: each model's own forward gives [B, T, V] logits on every rank; the loss runs on this
  rank's rows. ``share`` is the loss.
- ``sharded``: the forwards stop at the final hidden states (``gold_ds.engine.heads``); the
  completion rows' hidden states of all data-parallel ranks are gathered (``RowGather``), and each
  rank applies its vocabulary slice of both heads to all of them inside the fused losses
  (``gold_ds.losses.linear``), so no rank holds a [rows, V] tensor beyond one chunk. The loss is
  then the whole micro-step's on every rank (``share`` = loss / world); backward sends each rank's
  hidden states the gradient of its own rows (summed over the slices) and each head slice the
  gradient of all rows. Per micro-step, what crosses the network: the gathered hidden states
  (completion rows x H, both models) and, back, one all_reduce of the student's; per chunk of rows,
  a few floats per row for jsd and the merged log scales, a row-sharded exchange of the chunk's
  probabilities for uld/hybrid_uld (see ``gold_ds.losses``). The heads themselves never move.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..align import merge_log_scales
from ..data import concat_batches
from ..engine.heads import HeadSlice, final_hidden_states, head_spec
from ..losses import (byte_prefix_jsd, generalized_jsd, hybrid_uld, linear_byte_prefix_jsd, linear_generalized_jsd,
                      linear_hybrid_uld, linear_token_logprobs, linear_uld, uld)
from .collective import RowGather


def _forward(engine, inputs):
    """Logits [B, T, V'] of a micro batch's inputs (moved to the engine's device): ids and attention
    mask, plus a vision-language batch's pixel inputs (``pixel_values``, ``image_grid_thw``, ...)."""
    return engine(**{k: v.to(engine.device) for k, v in inputs.items() if k != "loss_mask"}, use_cache=False).logits


def _check_vocab(logits, vocab, who):
    if logits.shape[-1] < vocab:
        raise ValueError(f"the {who} model has {logits.shape[-1]} logits per position but its tokenizer has {vocab} tokens")


def _teacher_outputs(engine, micro_batches: list, hidden: bool) -> list:
    """Per micro batch, the teacher's [B, T, X] output on its inputs (final hidden states with
    ``hidden``, else logits), from one forward of all of them (see the module docstring)."""
    inputs = [mb.teacher for mb in micro_batches]
    batch = inputs[0] if len(inputs) == 1 else concat_batches(inputs)
    out = final_hidden_states(engine, batch) if hidden else _forward(engine, batch)
    pieces, start = [], 0
    for x in inputs:
        rows, length = x["input_ids"].shape
        pieces.append(out[start:start + rows, :length])
        start += rows
    return pieces


class _Heads:
    """Both models' vocabulary slices, and the fused losses' head arguments, for ``sharded``."""

    def __init__(self, student, teacher, student_vocab, teacher_vocab, shared: bool):
        self.world = dist.get_world_size()
        specs = head_spec(student.module, "student"), head_spec(teacher.module, "teacher")
        for spec, vocab, who in zip(specs, (student_vocab, teacher_vocab), ("student", "teacher")):
            rows = spec.module.weight.ds_shape[0] if hasattr(spec.module.weight, "ds_shape") else spec.module.weight.shape[0]
            if rows < vocab:
                raise ValueError(f"the {who} model's head has {rows} rows but its tokenizer has {vocab} tokens")
        self.student = HeadSlice(student, specs[0], student_vocab, "student")
        # one vocabulary (jsd): the teacher's slices are the student's rows
        self.teacher = HeadSlice(teacher, specs[1], teacher_vocab, "teacher", self.student.rows if shared else None)
        self.options = {**specs[0].options("student_"), **specs[1].options("teacher_")}

    def slices(self):
        """Per micro-step (every rank): (student weight, teacher weight, head keyword arguments)."""
        with torch.no_grad():
            t_weight, t_bias = self.teacher.weight(), self.teacher.bias()
        return self.student.weight(), t_weight, dict(self.options, student_bias=self.student.bias(),
                                                       teacher_bias=t_bias)

    def token_logprobs(self, side, hidden, weight, bias, tokens, temperature):
        spec = side.spec
        return linear_token_logprobs(hidden, weight, tokens, bias=bias, logit_scale=spec.logit_scale,
                                     softcap=spec.softcap, temperature=temperature, group=dist.group.WORLD)


class SharedVocabularyObjective:
    """Generalized JSD token by token (student and teacher share one vocabulary)."""

    def __init__(self, distill, student, teacher, vocab_size: int):
        self.student, self.teacher, self.vocab = student, teacher, vocab_size
        self.w_div, self.w_ce = distill.divergence_weight, distill.ce_weight
        self.beta, self.temperature = distill.beta, distill.temperature
        self.heads = _Heads(student, teacher, vocab_size, vocab_size, True) if distill.logits == "sharded" else None

    @torch.no_grad()
    def teacher_targets(self, micro_batches: list) -> list:
        outputs = _teacher_outputs(self.teacher, micro_batches, hidden=self.heads is not None)
        return [self._targets(mb, out) for mb, out in zip(micro_batches, outputs)]

    def _targets(self, mb, out):
        if self.heads is not None:  # the completion rows' hidden states of all ranks
            hidden = out[:, :-1][mb.student["loss_mask"].to(out.device)]
            return RowGather(hidden.shape[0], hidden.device).gather(hidden)
        logits = out[:, :-1]
        _check_vocab(logits, self.vocab, "teacher")
        return logits[..., :self.vocab]

    def loss(self, mb, targets):
        if self.heads is not None:
            return self._sharded_loss(mb, targets)
        mask = mb.student["loss_mask"].to(self.student.device)
        s_logits = _forward(self.student, mb.student)[:, :-1]
        _check_vocab(s_logits, self.vocab, "student")
        s_logits = s_logits[..., :self.vocab]
        loss = 0.0
        if self.w_div:
            loss = self.w_div * generalized_jsd(s_logits, targets.to(s_logits.device), beta=self.beta,
                                                temperature=self.temperature, mask=mask, reduction="sum")
        if self.w_ce:
            tokens = mb.student["input_ids"][:, 1:].to(mask.device)[mask]
            loss = loss + self.w_ce * F.cross_entropy(s_logits[mask].float(), tokens, reduction="sum")
        return loss, float(loss.detach())

    def _sharded_loss(self, mb, t_hidden):
        mask = mb.student["loss_mask"].to(self.student.device)
        hidden = final_hidden_states(self.student, mb.student)[:, :-1][mask]
        rows = RowGather(hidden.shape[0], hidden.device)
        s_hidden = rows.gather(hidden)
        s_weight, t_weight, heads = self.heads.slices()
        loss = 0.0
        if self.w_div:
            loss = self.w_div * linear_generalized_jsd(
                s_hidden, s_weight, t_hidden, t_weight, beta=self.beta, temperature=self.temperature,
                reduction="sum", group=dist.group.WORLD, **heads)
        if self.w_ce:
            tokens = rows.gather(mb.student["input_ids"][:, 1:].to(mask.device)[mask])
            loss = loss - self.w_ce * self.heads.token_logprobs(self.heads.student, s_hidden, s_weight,
                                                                heads["student_bias"], tokens, 1.0).sum()
        return loss, float(loss.detach()) / self.heads.world


def _inner_sum(values, start, end):
    """[G]: per group, the sum of ``values`` over its rows start+1 .. end-1 (fp64 running sum)."""
    run = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    return (run[end] - run[start + 1]).float()


class CrossTokenizerObjective:
    """ULD or hybrid ULD over aligned, merged groups (the two tokenizers may differ)."""

    def __init__(self, distill, student, teacher, assembler, log):
        self.student, self.teacher = student, teacher
        self.vs, self.vt = len(assembler.student.tokenizer), len(assembler.teacher.tokenizer)
        self.w_div, self.w_ce = distill.divergence_weight, distill.ce_weight
        self.ts = distill.temperature
        self.tt = distill.teacher_temperature if distill.teacher_temperature is not None else distill.temperature
        self.heads = _Heads(student, teacher, self.vs, self.vt, False) if distill.logits == "sharded" else None
        options = dict(student_temperature=self.ts, teacher_temperature=self.tt, reduction="sum")
        if self.heads is not None:
            options["group"] = dist.group.WORLD
        self.prefix = distill.loss == "byte_prefix_jsd"
        full, fused = (hybrid_uld, linear_hybrid_uld) if distill.loss == "hybrid_uld" else (uld, linear_uld)
        if self.prefix:
            dev = student.device
            tables = [(p.key.to(dev), p.piece.to(dev), p.whole.to(dev)) for p in assembler.prefix_projections()]
            reach = [float((p >= 0).any(0).float().mean()) for _, p, _ in tables]
            log(f"[gold_ds] byte_prefix_jsd projections: {reach[0]:.1%} of the student's tokens map to a teacher "
                f"piece, {reach[1]:.1%} of the teacher's to a student piece (tables [{tables[0][0].shape[0]}, "
                f"{self.vs}] and [{tables[1][0].shape[0]}, {self.vt}])")
            options.update(beta=distill.beta)
            self.divergence = lambda s, t, *heads, events, **kw: (
                linear_byte_prefix_jsd(s, heads[0], t, heads[1], *events, *tables, **options, **kw) if heads
                else byte_prefix_jsd(s, t, *events, *tables, **options, **kw))
        elif distill.loss == "hybrid_uld":
            s_ids, t_ids, match_rate = assembler.matched_vocabulary()
            log(f"[gold_ds] hybrid_uld vocabulary map: {s_ids.numel()} token pairs ({match_rate:.1%} of the "
                f"teacher's {self.vt} tokens match by bytes; the end-of-turn pair included)")
            ids = (s_ids.to(student.device), t_ids.to(student.device))
            options.update(beta=distill.beta, matched_weight=distill.matched_weight,
                           unmatched_weight=distill.unmatched_weight)
            self.divergence = lambda s, t, *heads, **kw: (fused(s, heads[0], t, heads[1], *ids, **options, **kw)
                                                          if heads else full(s, t, *ids, **options, **kw))
        else:
            self.divergence = lambda s, t, *heads, **kw: (fused(s, heads[0], t, heads[1], **options, **kw)
                                                          if heads else full(s, t, **options, **kw))

    @torch.no_grad()
    def teacher_targets(self, micro_batches: list) -> list:
        """Per micro batch, the teacher's first row of each group (logits, or with sharded heads the
        hidden state) and its merged log scale."""
        outputs = _teacher_outputs(self.teacher, micro_batches, hidden=self.heads is not None)
        targets = self._sharded_teacher_targets if self.heads is not None else self._teacher_targets
        return [targets(mb, out) for mb, out in zip(micro_batches, outputs)]

    @staticmethod
    def _event_data(a, dev):
        """The per-row arguments of ``byte_prefix_jsd`` for the alignment's events."""
        e = a.events
        return (e.side.to(dev), e.skip.to(dev), a.student_tokens.to(dev)[e.student_row.to(dev)],
                a.teacher_tokens.to(dev)[e.teacher_row.to(dev)])

    def _teacher_targets(self, mb, t_logits):
        a, dev = mb.alignment, self.student.device
        t_start, t_end = a.teacher_start.to(dev), a.teacher_end.to(dev)
        _check_vocab(t_logits, self.vt, "teacher")
        rows = a.teacher_rows.to(t_logits.device)
        if self.prefix:
            rows = rows[a.events.teacher_row.to(rows.device)]
            return t_logits[rows[:, 0], rows[:, 1], :self.vt].to(dev)
        t_rows = t_logits[rows[:, 0], rows[:, 1], :self.vt].to(dev)
        del t_logits
        t_scale = merge_log_scales(t_rows, a.teacher_tokens.to(dev), t_start, t_end, self.tt)
        return t_rows[t_start], t_scale

    def loss(self, mb, targets):
        if self.heads is not None:
            return self._sharded_loss(mb, targets)
        a, dev = mb.alignment, self.student.device
        s_logits = _forward(self.student, mb.student)
        _check_vocab(s_logits, self.vs, "student")
        rows = a.student_rows.to(dev)
        s_rows = s_logits[rows[:, 0], rows[:, 1], :self.vs]
        tokens = a.student_tokens.to(dev)
        loss = 0.0
        if self.w_div and self.prefix:
            loss = self.w_div * self.divergence(s_rows[a.events.student_row.to(dev)], targets,
                                                events=self._event_data(a, dev))
        elif self.w_div:
            s_start, s_end = a.student_start.to(dev), a.student_end.to(dev)
            s_scale = merge_log_scales(s_rows, tokens, s_start, s_end, self.ts)
            t_first, t_scale = targets
            loss = self.w_div * self.divergence(s_rows[s_start], t_first, student_log_scale=s_scale,
                                                teacher_log_scale=t_scale)
        if self.w_ce:  # the completion rows that count (the loss mask in flat row order)
            counted = mb.student["loss_mask"].to(dev)[rows[:, 0], rows[:, 1]]
            loss = loss + self.w_ce * F.cross_entropy(s_rows[counted].float(), tokens[counted], reduction="sum")
        return loss, float(loss.detach())

    # ------------------------------------------------------------------ sharded heads (see the docstring)
    @staticmethod
    def _gathered(states, rows, tokens, start, end):
        """All ranks' completion rows of one side (``states``: its [B, T, H] final hidden states):
        (RowGather, hidden [N, H], tokens [N], group start [G], end [G]) with the group indices
        shifted to the gathered rows."""
        dev = states.device
        rows = rows.to(dev)
        hidden = states[rows[:, 0], rows[:, 1]]
        gather = RowGather(hidden.shape[0], dev)
        groups = RowGather(start.numel(), dev)
        return (gather, gather.gather(hidden), gather.gather(tokens.to(dev)),
                groups.gather(start.to(dev) + gather.offset), groups.gather(end.to(dev) + gather.offset))

    def _sharded_teacher_targets(self, mb, states):
        a = mb.alignment
        if self.prefix:  # the teacher's hidden state at every event's row
            e = a.events
            _, hidden, _, rows, _ = self._gathered(states, a.teacher_rows, a.teacher_tokens, e.teacher_row,
                                                   e.teacher_row + 1)
            return hidden[rows]
        _, hidden, tokens, start, end = self._gathered(states, a.teacher_rows, a.teacher_tokens, a.teacher_start,
                                                       a.teacher_end)
        weight, bias = self.heads.teacher.weight(), self.heads.teacher.bias()
        logp = self.heads.token_logprobs(self.heads.teacher, hidden, weight, bias, tokens, self.tt)
        return hidden[start], _inner_sum(logp, start, end)

    def _sharded_loss(self, mb, targets):
        a, dev = mb.alignment, self.student.device
        start, end = (a.events.student_row, a.events.student_row + 1) if self.prefix else (a.student_start, a.student_end)
        rows, hidden, tokens, start, end = self._gathered(final_hidden_states(self.student, mb.student),
                                                          a.student_rows, a.student_tokens, start, end)
        s_weight, t_weight, heads = self.heads.slices()
        s_bias = heads["student_bias"]
        loss = 0.0
        logp = None
        if self.w_div and self.prefix:  # every rank's events, in rank order (as their rows)
            every = RowGather(len(a.events), dev)
            data = [every.gather(x) for x in self._event_data(a, dev)]
            loss = self.w_div * self.divergence(hidden[start], targets, s_weight, t_weight, events=data, **heads)
        elif self.w_div:
            logp = self.heads.token_logprobs(self.heads.student, hidden, s_weight, s_bias, tokens, self.ts)
            t_first, t_scale = targets
            loss = self.w_div * self.divergence(hidden[start], t_first, s_weight, t_weight,
                                                student_log_scale=_inner_sum(logp, start, end),
                                                teacher_log_scale=t_scale, **heads)
        if self.w_ce:
            if logp is None or self.ts != 1.0:
                logp = self.heads.token_logprobs(self.heads.student, hidden, s_weight, s_bias, tokens, 1.0)
            src = a.student_rows.to(dev)
            counted = rows.gather(mb.student["loss_mask"].to(dev)[src[:, 0], src[:, 1]])
            loss = loss - self.w_ce * logp[counted].sum()
        return loss, float(loss.detach()) / self.heads.world


def completion_nll(engine, head, batch, vocab: int):
    """(summed NLL of a batch's completion tokens (``loss_mask``), this rank's share of it); with
    ``head`` (a ``HeadSlice``) from the final hidden states of all ranks' rows, else from the
    logits (the first ``vocab``: the tokenizer's)."""
    mask = batch["loss_mask"].to(engine.device)
    tokens = batch["input_ids"][:, 1:].to(engine.device)[mask]
    if head is None:
        logits = _forward(engine, batch)[:, :-1]
        loss = F.cross_entropy(logits[mask][:, :vocab].float(), tokens, reduction="sum")
        return loss, float(loss.detach())
    hidden = final_hidden_states(engine, batch)[:, :-1][mask]
    rows = RowGather(hidden.shape[0], hidden.device)
    logp = linear_token_logprobs(rows.gather(hidden), head.weight(), rows.gather(tokens), bias=head.bias(),
                                 logit_scale=head.spec.logit_scale, softcap=head.spec.softcap,
                                 group=dist.group.WORLD)
    loss = -logp.sum()
    return loss, float(loss.detach()) / dist.get_world_size()


SHARDED_FROM_VOCAB = 16_384
"""``distill.logits=auto`` takes ``sharded`` from this many tokens in either tokenizer. Real LLM
vocabularies (32k-256k) are far above it; below it a micro-step's full logits are small, and the
sharded path's per-micro-step collectives cost more than they save (bench/vs_trl.py, vocabularies
of 274-320 tokens, bench/RESULTS.md)."""


def logits_path(distill, vocab_sizes, *deepspeed_configs) -> tuple:
    """(``sharded`` or ``full``, the reason) for ``distill.logits`` given both tokenizers' sizes and
    the models' DeepSpeed configs (see ``gold_ds.config.schema.DistillConfig.logits``)."""
    if distill.logits != "auto":
        return distill.logits, "set in the config"
    for ds in deepspeed_configs:
        off = ds.get("zero_optimization", {}).get("offload_param")
        if (off.get("device") if isinstance(off, dict) else off) == "nvme":
            return "full", "a model's parameters are offloaded to NVMe"
    largest = max(vocab_sizes)
    if largest >= SHARDED_FROM_VOCAB:
        return "sharded", f"a vocabulary of {largest} tokens (sharded from {SHARDED_FROM_VOCAB})"
    return "full", f"vocabularies of at most {largest} tokens (sharded from {SHARDED_FROM_VOCAB})"


def build_objective(distill, student, teacher, assembler, log):
    """The objective of ``distill.loss`` (``student``, ``teacher``: the engines). A head that
    ``distill.logits=sharded`` cannot apply is a ``ConfigError`` naming the model and the fallback."""
    if distill.cross_tokenizer:
        return CrossTokenizerObjective(distill, student, teacher, assembler, log)
    return SharedVocabularyObjective(distill, student, teacher, len(assembler.student.tokenizer))
