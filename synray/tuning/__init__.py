"""synray.tuning"""
