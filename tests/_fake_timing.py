"""The tuner's clock replaced by fixed times per kernel name, for the dispatch tests."""

from monoquant import tuner


def timing_by_name(monkeypatch, times: dict[str, float], timed: list[str]) -> None:
    """Every timed call of kernel ``name`` (``functools.partial(_LINEAR[name] or _CONV[name], module, x)``) takes
    ``times[name]`` seconds, 10 for names not given; the names are appended to ``timed`` in call order."""
    def timer(call):
        name = call.func.__name__.lstrip("_")
        timed.append(name)
        return times.get(name, 10.0)

    monkeypatch.setattr(tuner, "time_call", timer)
