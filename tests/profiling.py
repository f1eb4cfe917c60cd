"""The peak of a `torch.profiler` run with `profile_memory=True`: the CPU allocator's running total of bytes
allocated during the profile and still alive, at its maximum over every allocation event."""

from __future__ import annotations


def allocated_peak(prof) -> int:
    from torch._C._profiler import _EventType  # lazy: only the memory tests profile

    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            peak = max(peak, e.extra_fields.total_allocated)
        stack.extend(e.children)
    assert peak > 0, "the profiler saw no allocation"
    return peak
