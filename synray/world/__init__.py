"""synray.world"""
