"""synray.training"""
