"""The admin dashboard at `/admin`: server-rendered pages over the same services as the API."""
