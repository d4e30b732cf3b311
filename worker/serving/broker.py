"""The workers' Redis broker transport: kombu's, except for what it does with unacknowledged messages once
the connection to Redis is lost.

Tasks run in threads (worker/serving/celery_app.py), so when Redis goes away tasks are still running, and
in kombu 5.7 two things then raise AttributeError on the torn-down connection, which makes Celery stop the
whole worker ("Unrecoverable error"):
- the closing channel restores every unacknowledged message to the queue: those of tasks still running;
- a task that finishes afterwards acknowledges its message on that dead channel.
Here neither touches Redis. Nothing is lost: the unacknowledged message stays in Redis, which redelivers it
after the visibility timeout (the task then finds its job finished and does nothing), and a job whose worker
died is sent again by the API's reaper (service/recovery.py) long before that.
"""

from kombu.transport import redis, virtual


class QoS(redis.QoS):
    restore_at_shutdown = False

    def ack(self, delivery_tag):
        if self.channel.connection is None:  # the channel's connection was lost: forget the message here
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if self.channel.connection is None:
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().reject(delivery_tag, requeue=requeue)


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
