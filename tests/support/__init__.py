"""Helpers shared by the test modules (imported as `support.*`; tests/ is on sys.path because
pytest inserts the directory of the rootless tests/conftest.py). conftest.py keeps only fixtures.

- `support.servers`: local stand-ins for the network (a static HTTP server, a free port, polling
  a guest's forwarded port).
- `support.images`: the sample apps' builder (samples/build.py) and the jvmkit CLI as the VM
  tests run it.
"""
