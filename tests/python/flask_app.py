"""An HTTP app written for Dapr, as Dapr's docs show it, with no Tandem-specific code.

Serves `GET /dapr/subscribe` (topic `orders`, with a routing rule for created orders), a
subscription route whose answer each event chooses (`{"answer": "SUCCESS"|"RETRY"|"DROP"|
"RETRY-ONCE"|"404"|"500"}` in its data), a route for a topic a Subscription file declares,
methods to invoke, and `GET /received` with every event that arrived (for the test).
Usage: flask_app.py PORT
"""

import sys
import threading

from flask import Flask, jsonify, request

app = Flask(__name__)
lock = threading.Lock()
received = []
retried_once = set()


@app.route('/dapr/subscribe', methods=['GET'])
def subscribe():
    # Dapr's routing rules: created orders go to their own route, the others to the default.
    return jsonify([{
        'pubsubname': 'pubsub',
        'topic': 'orders',
        'routes': {'rules': [{'match': 'event.type == "order.created"', 'path': '/created'}], 'default': '/orders'},
    }])


def record(route):
    event = request.get_json(force=True)
    with lock:
        received.append({
            'route': route,
            'content_type': request.headers.get('Content-Type'),
            'pubsubname_header': request.headers.get('pubsubname'),
            'event': event,
        })
    return event


@app.route('/orders', methods=['POST'])
def orders():
    event = record('/orders')
    data = event.get('data') or {}
    answer = data.get('answer', 'SUCCESS') if isinstance(data, dict) else 'SUCCESS'
    if answer == '404':
        return '', 404
    if answer == '500':
        return 'boom', 500
    if answer == 'RETRY-ONCE':
        with lock:
            first = event['id'] not in retried_once
            retried_once.add(event['id'])
        answer = 'RETRY' if first else 'SUCCESS'
    return jsonify({'status': answer})


@app.route('/created', methods=['POST'])
def created():
    record('/created')
    return jsonify({'status': 'SUCCESS'})


@app.route('/declared', methods=['POST'])
def declared():
    record('/declared')
    return '', 200


@app.route('/received', methods=['GET'])
def what_arrived():
    with lock:
        return jsonify(received)


@app.route('/greet/<name>', methods=['GET', 'POST', 'PUT', 'DELETE'])
def greet(name):
    return jsonify({
        'name': name,
        'verb': request.method,
        'query': request.query_string.decode(),
        'caller': request.headers.get('dapr-caller-app-id'),
        'content_type': request.headers.get('Content-Type'),
        'body': request.get_data(as_text=True),
    }), 201, {'x-greeted': name}


if __name__ == '__main__':
    app.run(host='127.0.0.1', port=int(sys.argv[1]))
