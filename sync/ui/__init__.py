"""``vectorsync ui``: a local, read-only web explorer (status, neighbours, map, models).

A FastAPI app with Jinja2 templates (autoescaped) and plotly.js served from the ``plotly``
package; see ``app.create_app``. Needs the ``ui`` extra.
"""
