"""sseserver.web"""
