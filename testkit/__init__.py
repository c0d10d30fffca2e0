"""Test kit for student_sync: a local Directory API server and sample-district builders.

Used by the tests, the demo and the benchmark, never by a real run.
"""
