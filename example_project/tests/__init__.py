"""The example project's tests: its girder tasks on a real worker, through girder's pytest plugin."""
