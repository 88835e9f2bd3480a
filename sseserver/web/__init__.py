"""The application layer: routing with route metadata, the policies around every handler
(request ids, CORS, JWT, rate limits) and the context the routes share."""
