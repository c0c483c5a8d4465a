"""A small Celery project using girder: the portfolio, ratio and bogosity examples of the post.

``celery_app`` holds the Celery app and ``girder = Girder(app)``; ``tasks`` the girder tasks;
``demo`` (``python -m example_project.demo``) runs them on a private Redis and two real workers.
"""
