"""Reporting: result tables (tables) and the paper's figures and combined tables (figures), built from
finished result files alone, with no model in memory."""
