from twisted.application.service import ServiceMaker

callhomehub = ServiceMaker(
    "callhomehub",
    "hub.app.service",
    "SSH call-home hub for devices behind NAT",
    "callhomehub",
)
