"""Mode runners, one module per ``mode=``: each reads its config, calls the library and logs (``run(cfg, tracker)``).

``app.py`` holds the table from mode name to runner and the pre-flight checks every mode shares.
"""
