#!/usr/bin/env python3
"""tests/asyncua_server.py, misbehaving: every CreateSubscription is answered
with absurd revised parameters (publishing interval 1e300 ms, keep-alive and
lifetime counts of 2^32-1), while the server itself keeps publishing at the
requested rate. A client that multiplies those values unchecked overflows.
Same arguments and READY line as asyncua_server.py.
"""

import runpy
import sys
from pathlib import Path

from asyncua import ua
from asyncua.server.subscription_service import SubscriptionService

_create = SubscriptionService.create_subscription


async def _absurd(self, params, callback, session_id, request_callback=None):
    real = await _create(self, params, callback, session_id, request_callback)
    told = ua.CreateSubscriptionResult()
    told.SubscriptionId = real.SubscriptionId
    told.RevisedPublishingInterval = 1.0e300
    told.RevisedLifetimeCount = 0xFFFFFFFF
    told.RevisedMaxKeepAliveCount = 0xFFFFFFFF
    return told


SubscriptionService.create_subscription = _absurd

if __name__ == "__main__":
    server = Path(__file__).with_name("asyncua_server.py")
    sys.argv[0] = str(server)
    runpy.run_path(str(server), run_name="__main__")
