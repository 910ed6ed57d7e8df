"""Keep the main thread's alternate signal stack pointing at memory that lives.

CPython installs its signal handlers with ``SA_ONSTACK``: a signal (Ctrl-C, SIGTERM) is handled on the thread's
alternate signal stack when one is set. OpenVINO's CPU plugin (2026.4) sets one of its own while it compiles a model
and puts back the one it found when that model is released; openvino-genai's ``LLMPipeline`` frees its plugin's stack
when the pipeline goes. Released out of order (a pipeline, then a compiled model made while it lived), the plugin puts
back the freed stack, and the next signal the process gets is a segmentation fault in ``kill()`` instead of the
handler (seen: ``bench --backends ovgenai,openvino`` then SIGTERM; the suite's signal tests after the ovgenai tests).

:func:`keep_valid` sets a stack this module owns for the life of the process. The OpenVINO backends call it after
releasing their compiled models, so whatever the plugin put back, the stack left set is valid; a model compiled later
saves ours and puts ours back.
"""

from __future__ import annotations

import ctypes
import sys
import threading

SIZE = 1 << 16  # 64 KiB: well above SIGSTKSZ for CPython's C-level handler (it only sets a flag)


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_stack: ctypes.Array[ctypes.c_char] | None = None


def current() -> int | None:
    """The calling thread's alternate signal stack's address (None: none set, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    old = _StackT()
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(old)) != 0 or old.ss_flags & 2:  # SS_DISABLE
        return None
    return int(old.ss_sp or 0) or None


def keep_valid() -> None:
    """On Linux, in the main thread (where Python runs its signal handlers): set this module's own alternate signal
    stack (allocated once, never freed). Elsewhere: nothing."""
    global _stack
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return
    if _stack is None:
        _stack = ctypes.create_string_buffer(SIZE)
    st = _StackT(ctypes.addressof(_stack), 0, SIZE)
    ctypes.CDLL(None).sigaltstack(ctypes.byref(st), None)  # fails only while running on the alternate stack


def own_stack() -> int | None:
    """The address of this module's stack (None until :func:`keep_valid` first ran)."""
    return ctypes.addressof(_stack) if _stack is not None else None
