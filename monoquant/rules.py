"""``SkipRules``: which layers to leave in float, each decision with a reason.

Name patterns are shell globs (``"encoder.*.fc1"``, matched with :func:`fnmatch.fnmatchcase` against the
full module name) or compiled regular expressions (``re.compile(r"layers\\.\\d+\\.attn")``, matched with
``search``). A pattern that matches no layer is reported in :attr:`QuantReport.unmatched_rules`, since it
is probably a typo.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from .errors import ConfigError
from .formats import WeightSpec
from .nn import quant_class_for

if TYPE_CHECKING:
    from .tuning import LayerSensitivity

Pattern = str | re.Pattern

DEFAULT_MIN_PARAMS = 1024
"""``SkipRules.defaults()`` leaves layers with fewer weights than this in float: they cost little memory
and time, and tiny layers (first convs, small projections) are the most sensitive to quantization."""

HEAD_NAMES = ("lm_head", "*.lm_head", "head", "*.head", "classifier", "*.classifier", "output", "*.output")
"""Names that ``skip_head=True`` treats as output heads. When no candidate layer has such a name (e.g. a plain
``nn.Sequential``), the last ``nn.Linear`` (or transformers ``Conv1D``) in registration order is taken as the head
instead."""

HEAD_REASON = "output head (skip_head=True)"
LAST_LINEAR_HEAD_REASON = ("output head: the model's last nn.Linear or transformers Conv1D (skip_head=True; no layer "
                           "is named like a head)")


def exact_pattern(name: str) -> str | re.Pattern:
    """A skip pattern matching exactly the layer ``name``."""
    return re.compile("^" + re.escape(name) + "$") if any(c in name for c in "*?[") else name


def _matches(pattern: Pattern, name: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.search(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _describe(pattern: Pattern) -> str:
    return f"re:{pattern.pattern}" if isinstance(pattern, re.Pattern) else pattern


@dataclass(frozen=True)
class Decision:
    """Whether one layer is quantized; ``reason`` says why not (empty when it is)."""

    quantize: bool
    reason: str = ""
    group_size: int | None = None


@dataclass
class SkipRules:
    """Rules that keep layers in float.

    Args:
        include: if given, only layers whose name matches one of these patterns are quantized.
        exclude: layers whose name matches one of these patterns stay float.
        exclude_types: layers that are instances of these types stay float.
        predicate: ``(name, module) -> bool``; ``True`` keeps the layer in float.
        min_params: layers with fewer weight elements stay float.
        skip_head: keep output heads in float: layers named like :data:`HEAD_NAMES`, or, when none is, the
            model's last ``nn.Linear`` or transformers ``Conv1D`` (in registration order).

    Rules are checked in this order and the first that applies gives the reason: include, exclude, types,
    predicate, head, size, then shapes the format cannot handle (the format's ``unfit_reason``).
    """

    include: Sequence[Pattern] = ()
    exclude: Sequence[Pattern] = ()
    exclude_types: tuple[type, ...] = ()
    predicate: Callable[[str, nn.Module], bool] | None = None
    min_params: int = 0
    skip_head: bool = False
    _used: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    _heads: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # a lone pattern or type is a common slip: exclude="fc1" would otherwise be iterated as the patterns
        # "f", "c", "1", and exclude_types=nn.Linear would fail with a bare TypeError at the first layer
        for attr in ("include", "exclude"):
            value = getattr(self, attr)
            if isinstance(value, (str, re.Pattern)):
                setattr(self, attr, [value])
            bad = [p for p in getattr(self, attr) if not isinstance(p, (str, re.Pattern))]
            if bad:
                raise ConfigError(f"SkipRules {attr} takes name patterns (str globs or re.compile(...)), "
                                  f"got {bad[0]!r}")
        if isinstance(self.exclude_types, type):
            self.exclude_types = (self.exclude_types,)
        bad_types = [t for t in self.exclude_types if not isinstance(t, type)]
        if bad_types:
            raise ConfigError(f"SkipRules exclude_types takes classes such as nn.Conv2d, got {bad_types[0]!r}")
        n = self.min_params
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not n >= 0:
            raise ConfigError(f"SkipRules min_params must be a non-negative number of weights, got {n!r}")

    @classmethod
    def defaults(cls, *, skip_head: bool = False, min_params: int = DEFAULT_MIN_PARAMS, **kwargs) -> SkipRules:
        """Sensible protection: tiny layers (< ``min_params`` weights) stay float; output heads optionally."""
        return cls(min_params=min_params, skip_head=skip_head, **kwargs)

    @classmethod
    def none(cls) -> SkipRules:
        """Quantize every eligible layer."""
        return cls()

    @classmethod
    def from_sensitivity(
        cls, results: Sequence[LayerSensitivity], *, min_sqnr_db: float | None = None, top: int | None = None,
        base: SkipRules | None = None,
    ) -> SkipRules:
        """Keep float the ``top`` most damaging layers of :func:`monoquant.sensitivity` results and/or those whose
        output SQNR (quantized alone) is below ``min_sqnr_db``, on top of ``base`` (default: :meth:`defaults`)."""
        if min_sqnr_db is None and top is None:
            raise ConfigError("pass min_sqnr_db=... and/or top=... to say which layers to keep float")
        ranked = sorted(results, key=lambda r: r.sqnr_db)
        keep = {r.name for r in ranked[: top or 0]}
        if min_sqnr_db is not None:
            keep |= {r.name for r in ranked if r.sqnr_db < min_sqnr_db}
        base = base if base is not None else cls.defaults()
        names = [exact_pattern(r.name) for r in ranked if r.name in keep]
        return dataclasses.replace(base, exclude=[*base.exclude, *names])

    def start(self, candidates: Sequence[tuple[str, nn.Module]] | None = None) -> None:
        """Forget which patterns matched; called by ``quantize_`` with every candidate ``(name, layer)``.

        With ``candidates``, output heads are found once for the whole model (see ``skip_head``); without,
        only names are used.
        """
        self._used = set()
        self._heads = None
        if candidates is not None and self.skip_head:
            named = [n for n, _ in candidates if self._is_head_name(n)]
            linears = [n for n, m in candidates  # nn.Linear, transformers' Conv1D: layers run as linear maps
                       if (q := quant_class_for(m)) is not None and q.kernel_family == "linear"]
            if named:
                self._heads = dict.fromkeys(named, HEAD_REASON)
            else:
                self._heads = {linears[-1]: LAST_LINEAR_HEAD_REASON} if linears else {}

    @staticmethod
    def _is_head_name(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in HEAD_NAMES)

    def _first_match(self, patterns: Sequence[Pattern], name: str) -> Pattern | None:
        for p in patterns:
            if _matches(p, name):
                self._used.add(_describe(p))
                return p
        return None

    def decide(self, name: str, module: nn.Module, spec: WeightSpec) -> Decision:
        """Quantize ``module`` (called ``name``) with ``spec``, or keep it float and say why."""
        if self.include and self._first_match(self.include, name) is None:
            return Decision(False, "not matched by include patterns")
        hit = self._first_match(self.exclude, name)
        if hit is not None:
            return Decision(False, f"excluded by name pattern '{_describe(hit)}'")
        for t in self.exclude_types:
            if isinstance(module, t):
                self._used.add(t.__name__)
                return Decision(False, f"excluded by type {t.__name__}")
        if self.predicate is not None and self.predicate(name, module):
            return Decision(False, "excluded by predicate")
        if self.skip_head:
            if self._heads is not None and name in self._heads:
                return Decision(False, self._heads[name])
            if self._heads is None and self._is_head_name(name):
                return Decision(False, HEAD_REASON)
        weight = quant_class_for(module).float_weight(module)  # output channels first
        n_weights = weight.numel()
        if n_weights < self.min_params:
            return Decision(False, f"too small: {n_weights} weights < min_params={self.min_params}")
        cols = weight[0].numel()
        reason = spec.unfit_reason(cols)
        if reason is not None:
            return Decision(False, reason)
        return Decision(True, group_size=spec.resolve_group_size(cols))

    def unmatched(self) -> list[str]:
        """Patterns and types that matched no layer in the last run (probably typos)."""
        names = [_describe(p) for p in (*self.include, *self.exclude)] + [t.__name__ for t in self.exclude_types]
        return [n for n in names if n not in self._used]
