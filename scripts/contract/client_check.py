"""A client generated from the OpenAPI document by openapi-python-client, used
as a script would use it: typed requests in, typed responses out, problem
documents as `Problem`. Run by scripts/api-contract against a live server.

    python client_check.py BASE_URL API_KEY
"""

import subprocess
import sys

from reachback_api_client import AuthenticatedClient
from reachback_api_client.api.default import (
    admin_me,
    bindings_get,
    bindings_list,
    devices_get,
    enroll_enroll,
    keys_create,
    ranges_create,
    ranges_delete,
    ranges_get,
    ranges_list,
    ranges_patch,
)
from reachback_api_client.models import (
    Device,
    Enrollment,
    EnrollmentFields,
    EnrollmentKeyFields,
    IpBinding,
    IpRange,
    IpRangeFields,
    IpRangeFieldsChange,
    Location,
    NewEnrollmentKey,
    Platform,
    Problem,
    RoleName,
)
from reachback_api_client.models.ranges_list_sort import RangesListSort


def public_key() -> str:
    private = subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519"], check=True, capture_output=True).stdout
    return subprocess.run(["openssl", "pkey", "-pubout"], input=private, check=True, capture_output=True).stdout.decode()


def main() -> None:
    base_url, token = sys.argv[1], sys.argv[2]
    client = AuthenticatedClient(base_url=base_url, token=token, raise_on_unexpected_status=True)

    me = admin_me.sync(client=client)
    assert me.role == RoleName.SUPERADMIN, me

    created = ranges_create.sync(
        client=client,
        body=IpRangeFields(name="Client laptops", range_="100.100.0.0/24", location=Location(city="Lyon", country="FR")),
    )
    assert isinstance(created, IpRange), created
    assert created.total_ips == 254 and created.used_ips == 0 and created.location.city == "Lyon", created

    # a name that only looks like the existing one is a 409 problem naming it
    impostor = ranges_create.sync(client=client, body=IpRangeFields(name="Client l\u0430ptops", range_="100.100.1.0/24"))
    assert isinstance(impostor, Problem) and impostor.status == 409, impostor
    assert impostor.additional_properties.get("existing") == "Client laptops" or getattr(impostor, "existing", None) == "Client laptops", impostor

    changed = ranges_patch.sync(client=client, id=created.id, body=IpRangeFieldsChange(description="second floor"))
    assert isinstance(changed, IpRange) and changed.description == "second floor" and changed.name == "Client laptops", changed

    page = ranges_list.sync(client=client, sort=RangesListSort("-name"), page_size=10)
    assert page.total >= 1 and any(item.id == created.id for item in page.items), page

    key = keys_create.sync(client=client, body=EnrollmentKeyFields(username="dana@corp.example", reusable=True))
    assert isinstance(key, NewEnrollmentKey) and key.key.startswith("rbe_"), key

    enrolled = enroll_enroll.sync(
        client=client,
        body=EnrollmentFields(enrollment_key=key.key, hostname="dana-laptop.corp.example", platform=Platform.LINUX, public_key=public_key()),
    )
    assert isinstance(enrolled, Enrollment), enrolled
    assert enrolled.virtual_ip.startswith("100.100.0."), enrolled

    binding = bindings_get.sync(client=client, ip=enrolled.virtual_ip)
    assert isinstance(binding, IpBinding) and binding.device_id == enrolled.device_id and binding.username == "dana@corp.example", binding
    device = devices_get.sync(client=client, id=enrolled.device_id)
    assert isinstance(device, Device) and device.platform == Platform.LINUX, device
    listed = bindings_list.sync(client=client, username="dana")
    assert listed.total == 1 and listed.items[0].ip == enrolled.virtual_ip, listed

    # refusals come back typed, with the field named
    bad = ranges_create.sync(client=client, body=IpRangeFields(name="Bad", range_="100.100.0.0/33"))
    assert isinstance(bad, Problem) and bad.status in (400, 422), bad
    in_use = ranges_delete.sync_detailed(client=client, id=created.id)
    assert in_use.status_code == 409, in_use
    gone = ranges_get.sync(client=client, id="no-such-range")
    assert isinstance(gone, Problem) and gone.status == 404, gone
    print("generated client: ok (ranges, keys, enrollment, bindings, devices, problems)")


if __name__ == "__main__":
    main()
