"""The web UI (`posttrain ui`): the app, its Chat / Annotate / Train tabs and their checks."""
