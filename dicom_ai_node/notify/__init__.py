"""The notification stage: webhooks told, in signed JSON, when a job's results are delivered or a job fails."""
