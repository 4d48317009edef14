"""Dapr's official Python SDK with its defaults against tandemd.

DaprClient() waits on the HTTP API's /v1.0/healthz/outbound (DAPR_HTTP_PORT); invoke_method
goes over the HTTP API (the SDK's default); state, publish and metadata go over the gRPC API
(DAPR_GRPC_PORT). Prints one JSON object with what it saw; the Rust test checks it.
"""

import json

from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError, DaprInternalError

seen = {}
with DaprClient() as d:
    reply = d.invoke_method(
        'orders',
        'greet',
        data=json.dumps({'name': 'py'}),
        content_type='application/json',
        http_verb='POST',
        http_querystring=(('lang', 'en'),),
    )
    seen['invoke'] = {'text': reply.text(), 'content_type': reply.content_type, 'status': reply.status_code}
    # The SDK's own defaults: GET, no body.
    seen['invoke_default'] = d.invoke_method('orders', 'greet').text()
    try:
        d.invoke_method('orders', 'missing', http_verb='POST')
        seen['invoke_error'] = None
    except DaprInternalError as error:
        seen['invoke_error'] = {'status': getattr(error, 'status_code', None), 'message': error.as_dict()['message']}
    try:
        d.invoke_method('nobody', 'greet')
        seen['unknown_app'] = None
    except DaprInternalError as error:
        seen['unknown_app'] = error.as_dict()['errorCode']

    d.save_state('statestore', 'py-key', 'py-value')
    state = d.get_state('statestore', 'py-key')
    seen['state'] = {'data': state.data.decode(), 'etag': state.etag}
    # A store that does not exist: the SDK reads the reason from the status's ErrorInfo.
    try:
        d.get_state('no-such-store', 'py-key')
        seen['state_error'] = None
    except DaprGrpcError as error:
        details = error.status_details()
        seen['state_error'] = {
            'code': error.code().name,
            'error_code': error.error_code(),
            'domain': (details.error_info or {}).get('domain'),
            'resource': (details.resource_info or {}).get('resource_name'),
        }
    d.publish_event('pubsub', 'orders', json.dumps({'from': 'python'}), data_content_type='application/json')
    metadata = d.get_metadata()
    seen['metadata'] = {
        'id': metadata.application_id,
        'components': sorted(component.name for component in metadata.registered_components),
    }
print(json.dumps(seen))
