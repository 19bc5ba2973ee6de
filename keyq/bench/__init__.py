"""keyq's benchmark, side by side with plain Celery (scripts/bench is the entry point).

Not imported by the package itself: the modules here start real worker processes on real Redis
and PostgreSQL and measure them. ``stats`` holds the pure functions, ``infra`` the servers and the
machine, ``procs`` the worker subprocesses, ``scenarios`` the measurements, ``report`` the output.
"""
