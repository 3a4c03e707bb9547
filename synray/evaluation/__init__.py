"""synray.evaluation"""
