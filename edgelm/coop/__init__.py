"""Device-cloud cooperative runtime: answer on the device, send hard queries to an OpenAI-compatible cloud."""
