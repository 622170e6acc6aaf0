from twisted.application.service import ServiceMaker

callhomehub = ServiceMaker(
    "callhomehub",
    "callhomehub.service",
    "SSH call-home hub for devices behind NAT",
    "callhomehub",
)
