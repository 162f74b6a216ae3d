"""A user-style session checker, loaded by name through SESSION_CHECKER."""

from hexscrape.health import BAN, SessionChecker


class CaptchaChecker(SessionChecker):
    def check_response(self, request, response):
        if response.status == 200 and b"CAPTCHA" in response.body:
            return BAN
        return super().check_response(request, response)
