"""What a piece of code compiles: the programs XLA compiled while a ``with`` block ran."""
import contextlib

import jax.monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compiled_programs():
    """Yields a list that fills with the name of every program XLA compiles inside the block
    (``jit(f)``; an eager operation compiles one of its own, ``jit(multiply)``)."""
    names = []

    def heard(event, duration, **fields):
        if event == _BACKEND_COMPILE:
            names.append(fields.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(heard)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(heard)
