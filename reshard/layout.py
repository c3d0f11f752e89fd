"""Layout: how a model is split over tensor, pipeline and expert parallel ranks.

Pure arithmetic, no I/O. Layer assignment follows Megatron-core (FORMATS.md §3, Pipeline):
even split, virtual pipeline chunks, and an uneven first/last stage.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional

from .errors import LayoutError
from .spec import ModelSpec


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    etp: Optional[int] = None
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    make_vocab_size_divisible_by: int = 128

    @property
    def vp(self) -> int:
        return self.vpp or 1

    @property
    def expert_tp(self) -> int:
        """Expert tensor parallel size (Megatron's default: the tensor parallel size)."""
        return self.etp or self.tp

    def for_entry(self, entry) -> "Layout":
        """The layout an entry's tensor is split by: experts use expert-TP, the rest TP."""
        if getattr(entry, "expert", None) is None or self.expert_tp == self.tp:
            return self
        return dataclasses.replace(self, tp=self.expert_tp)

    def expert_rank(self, expert: int, num_experts: int) -> tuple:
        """``(ep_rank, local index)`` of global expert ``expert``."""
        per = num_experts // self.ep
        return expert // per, expert % per

    def padded_vocab(self, vocab_size: int) -> int:
        """Megatron's padded vocab: ``ceil(V / (m*tp)) * (m*tp)``."""
        multiple = self.make_vocab_size_divisible_by * self.tp
        return int(math.ceil(vocab_size / multiple) * multiple)

    def stage_layers(self, num_layers: int) -> List[List[List[int]]]:
        """Global layer indices held by ``[pp_rank][vp_stage]``, in local order."""
        pp, vp = self.pp, self.vp
        first, last = self.first_stage_layers, self.last_stage_layers
        if first is None and last is None:
            per_stage = [num_layers // pp] * pp
        else:
            a = first if first is not None else None
            b = last if last is not None else None
            middle_stages = pp - (a is not None) - (b is not None)
            rest = num_layers - (a or 0) - (b or 0)
            mid = rest // middle_stages if middle_stages else 0
            per_stage = [mid] * pp
            if a is not None:
                per_stage[0] = a
            if b is not None:
                per_stage[-1] = b
        if vp == 1:
            out, start = [], 0
            for n in per_stage:
                out.append([list(range(start, start + n))])
                start += n
            return out
        chunk = num_layers // (pp * vp)
        return [
            [list(range(v * (num_layers // vp) + p * chunk, v * (num_layers // vp) + (p + 1) * chunk))
             for v in range(vp)]
            for p in range(pp)
        ]

    def problems(self, spec: ModelSpec) -> List[str]:
        """Every reason this layout cannot hold ``spec`` (empty when it can)."""
        out = []
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                out.append(f"parallel.target_{name}={getattr(self, name)} must be >= 1")
        if self.etp is not None and self.etp < 1:
            out.append(f"parallel.target_etp={self.etp} must be >= 1 or null")
        if self.vpp is not None and self.vpp < 1:
            out.append(f"parallel.target_vpp={self.vpp} must be >= 1 or null")
        if self.make_vocab_size_divisible_by < 1:
            out.append("parallel.make_vocab_size_divisible_by must be >= 1")
        if out:
            return out
        tp, L = self.tp, spec.num_layers
        if spec.num_attention_heads % tp:
            out.append(f"num_attention_heads={spec.num_attention_heads} is not divisible by tp={tp}")
        ng = spec.num_query_groups
        if ng % tp and tp % ng:
            out.append(f"num_query_groups={ng} must be a multiple or a divisor of tp={tp} (as Megatron-core requires)")
        if not spec.num_experts and spec.ffn_hidden_size % tp:
            out.append(f"ffn_hidden_size={spec.ffn_hidden_size} is not divisible by tp={tp}")
        if spec.qkv_rows % tp:
            out.append(f"fused QKV rows (nh+2*ng)*head_dim={spec.qkv_rows} are not divisible by tp={tp}")
        if spec.num_experts:
            E, etp = spec.num_experts, self.expert_tp
            if E % self.ep:
                out.append(f"num_experts={E} is not divisible by ep={self.ep}")
            if spec.expert_ffn % etp:
                out.append(f"moe_ffn_hidden_size={spec.expert_ffn} is not divisible by expert tp={etp}")
            if spec.shared_expert_ffn_hidden_size % tp:
                out.append(f"shared_expert_ffn_hidden_size={spec.shared_expert_ffn_hidden_size} is not "
                           f"divisible by tp={tp}")
        elif self.ep != 1 or self.etp not in (None, tp):
            out.append(f"ep={self.ep}/etp={self.etp} apply to mixture-of-experts models; "
                       f"{spec.name or spec.model_type} is dense")
        out += self._pipeline_problems(L)
        return out

    def _pipeline_problems(self, L: int) -> List[str]:
        pp, vp = self.pp, self.vp
        first, last = self.first_stage_layers, self.last_stage_layers
        if first is not None or last is not None:
            if vp > 1:
                return ["an uneven first/last pipeline stage cannot be combined with a virtual pipeline (vpp)"]
            fixed = (first or 0) + (last or 0)
            middle = pp - (first is not None) - (last is not None)
            if middle < 0 or (first is not None and last is not None and pp < 2):
                return [f"first/last stage layer counts need pp >= 2 (pp={pp})"]
            rest = L - fixed
            if rest < 0 or (middle and rest % middle) or (not middle and rest):
                return [f"num_layers={L} minus first/last stage layers ({fixed}) does not split evenly "
                        f"over the {middle} middle stage(s)"]
            return []
        if L % (pp * vp):
            what = f"pp*vpp={pp}*{vp}" if vp > 1 else f"pp={pp}"
            return [f"num_layers={L} is not divisible by {what}"]
        return []

    def check(self, spec: ModelSpec) -> None:
        problems = self.problems(spec)
        if problems:
            raise LayoutError(
                f"target layout tp={self.tp} pp={self.pp} vpp={self.vpp}"
                + (f" ep={self.ep} etp={self.expert_tp}" if self.ep > 1 or self.etp else "")
                + f" does not fit the model "
                f"({spec.name or spec.model_type}, {spec.num_layers} layers):\n  - " + "\n  - ".join(problems)
                + "\nChoose parallel sizes that divide these numbers."
            )
