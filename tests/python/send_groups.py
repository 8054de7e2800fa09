"""Sends Group calls through the official segment-analytics-python client to a host.

Usage: send_groups.py HOST WRITE_KEY COUNT GZIP(0|1)
Exits 1, printing the errors, if the client reported any.
"""
import sys

from segment.analytics import Client

host, write_key, count, gzip = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
errors = []
client = Client(
    write_key,
    host=host,
    gzip=gzip,
    max_retries=2,
    on_error=lambda error, batch: errors.append(repr(error)),
)
for i in range(count):
    client.group(
        user_id=f"user-{i}",
        group_id=f"group-{i % 7}",
        traits={"name": "Acme", "plan": None, "total billed": i, "employees": 329},
        message_id=f"py-{i}",
    )
client.shutdown()
if errors:
    print("client errors:", errors)
    sys.exit(1)
print(f"sent {count}")
