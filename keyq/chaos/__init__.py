"""keyq's chaos tool (scripts/chaos is the entry point): a journal load on real workers while a
seeded schedule kills, pauses and restarts what they depend on, then a check of every key.

Not imported by the package itself. ``schedule`` (the seeded fault plan) and ``verify`` (the
journal invariant) are pure; ``servers`` starts the private Redis and PostgreSQL, ``poison`` builds
raw broker garbage, ``broker`` says what is left on the broker, ``cluster`` runs and supervises
the worker processes, ``load`` the producers, ``report`` the summary, ``run`` the orchestration
and the exit code.
"""
