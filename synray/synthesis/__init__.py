"""synray.synthesis"""
