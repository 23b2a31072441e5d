"""What the server and the trainer share: data and prompts, answers and bounded verification, the Tier-2 hint,
configs, and the packed top-K array format (and, with the server issue, the client library)."""
