from twisted.application.service import ServiceMaker

mtad = ServiceMaker("mtad", "mtad.tap", "mtad mail delivery platform", "mtad")
