"""What a Slimstore process is built from: its settings (:mod:`runtime.settings`) and the
long-lived pieces made from them (:mod:`runtime.process`: engine, sessions, blob store, blob
cache, and the worker). The API (``service``) and the server verbs of the CLI both start here.
"""
