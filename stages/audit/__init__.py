"""verify's audit: the checks a reviewer runs on a submission, and the claims they are held against."""
