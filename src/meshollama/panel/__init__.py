"""The web panel's static files (served at /ui by gateway.panel_routes)."""
