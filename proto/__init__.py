"""The wire contract: ``teacher.proto`` and its generated modules ``teacher_pb2`` / ``teacher_pb2_grpc``.

Regenerate with ``python -m brts.proto.generate`` after editing the .proto; a test fails when they are stale.
"""
