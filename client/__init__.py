"""hakuriver.client: the command line and Python API for submitting and querying tasks."""
