"""Small operator CLIs over pipeline and state."""
